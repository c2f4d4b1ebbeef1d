/*! pgdn.js: the browser client of pgdn. Plain JS, no build step, no dependencies.
 *
 * Load it with <script src="/pgdn.js"></script> (every pgdn server serves it);
 * it defines window.Pgdn. Wire contract: PROTOCOL.md.
 *
 *   const client = new Pgdn.Client({
 *     url: '/ws',                  // relative, or absolute ws(s):// or http(s):// URL
 *     token: 'jwt',                // or a function returning a token or a Promise of one,
 *                                  // called before every attempt (so it can refresh it)
 *     onNotification(n) {},        // {id, type, payload, timestamp, user_id?, group_ids?}, each id once
 *     onConnect({userId, connectionId, resumed}) {},  // resumed: it sent since=<lastId>
 *     onDisconnect({code, reason, retryIn, wasConnected}) {},  // it reconnects in retryIn ms
 *     onStop({code, reason}) {},   // closed with 1008 (bad token, kicked, rate limit): no retry
 *     onHistoryGap(frame) {},      // the server could not replay all that was missed: refetch
 *     onFrame(f) {},               // any other frame: pong, error, a handler's reply
 *     onStateChange(state) {},     // 'connecting' is reported on every attempt
 *     pingInterval: 25000,         // ms between pings; no answer to one by the next = dead link
 *     minBackoff: 500,             // the first retry waits minBackoff/2 to minBackoff ms ...
 *     maxBackoff: 30000,           // ... doubling per failed attempt up to maxBackoff/2 to maxBackoff
 *     since: null,                 // resume from this message id on the first connect
 *   });
 *   client.connect();     // (re)connects now; again after onStop, e.g. with a new token
 *   client.disconnect();  // closes and stays closed (state 'idle')
 *   client.send(obj);     // sends a frame (objects as JSON); false when not connected
 *   client.ping();        // sends a ping now; the pong goes to onFrame
 *   client.retryNow();    // while waiting to reconnect: try at once
 *   client.state          // 'idle' | 'connecting' | 'connected' | 'disconnected' | 'stopped'
 *   client.lastId         // id of the last notification (settable, e.g. restored from storage)
 *   client.userId, client.connectionId, client.attempts, client.retryAt, client.url
 *
 * After any close except 1008 it reconnects with exponential backoff and jitter
 * (also when the token function fails: the error is the reason in onDisconnect),
 * sending since=<lastId> so that the server replays what was published meanwhile;
 * ids already seen are dropped. A close with 1008 stops it until connect() is
 * called again. A local 'no pong' close is reported as code 4000. While it
 * waits to reconnect, the browser's 'online' event makes it try at once.
 */
(function (root) {
  'use strict';

  const SEEN_MAX = 1000; // ids remembered to drop duplicates

  function isNotification(f) {
    return typeof f.id === 'string' && typeof f.type === 'string' &&
      typeof f.timestamp === 'string' && !!f.payload && typeof f.payload === 'object';
  }

  class Client {
    constructor(options) {
      const o = Object.assign({ url: '/ws', pingInterval: 25000, minBackoff: 500, maxBackoff: 30000 }, options);
      this.options = o;
      const base = typeof location !== 'undefined' ? location.href : undefined;
      const u = new URL(o.url, base);
      if (u.protocol === 'http:') u.protocol = 'ws:';
      if (u.protocol === 'https:') u.protocol = 'wss:';
      this.url = u.href;            // the endpoint, without token
      this.state = 'idle';
      this.userId = null;
      this.connectionId = null;
      this.attempts = 0;            // failed attempts in a row
      this.retryAt = null;          // ms epoch of the next attempt while 'disconnected'
      this._lastId = o.since || null;
      this._seen = new Set();
      this._order = [];
      this._ws = null;
      this._gen = 0;                // bumped on connect()/disconnect(): stale callbacks see a mismatch
      this._timers = {};
      this._onOnline = () => this.retryNow();
      if (typeof addEventListener === 'function') addEventListener('online', this._onOnline);
    }

    get lastId() { return this._lastId; }
    set lastId(id) {
      this._lastId = id || null;
      this._seen.clear();
      this._order = [];
    }

    connect() {
      this._teardown();
      this.attempts = 0;
      this._open(++this._gen);
    }

    disconnect() {
      this._gen++;
      this._teardown();
      this.connectionId = null;
      this._setState('idle');
    }

    send(frame) {
      const ws = this._ws;
      if (!ws || ws.readyState !== 1 || this.state !== 'connected') return false;
      ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
      return true;
    }

    ping() {
      if (!this.send({ type: 'ping', timestamp: Date.now() })) return false;
      if (this._pingSentAt == null) this._pingSentAt = Date.now();
      return true;
    }

    retryNow() {
      if (this.state === 'disconnected') {
        clearTimeout(this._timers.retry);
        this._open(this._gen);
      }
    }

    // ----- internals -----
    _emit(name, arg) {
      const f = this.options[name];
      if (typeof f !== 'function') return;
      try { f.call(this, arg); } catch (e) { console.error('pgdn: ' + name + ' threw', e); }
    }

    _setState(s) {
      if (this.state === s) return;
      this.state = s;
      this._emit('onStateChange', s);
    }

    _teardown() {
      clearTimeout(this._timers.retry);
      clearInterval(this._timers.ping);
      this._timers = {};
      this.retryAt = null;
      const ws = this._ws;
      this._ws = null;
      if (ws) {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(1000); } catch { /* already closed */ }
      }
    }

    async _open(gen) {
      this.retryAt = null;
      this.state = 'connecting';
      this._emit('onStateChange', 'connecting'); // on every attempt
      let token;
      try {
        const t = this.options.token;
        token = typeof t === 'function' ? await t() : t;
      } catch (e) {
        if (gen === this._gen) this._closed(gen, null, 'token: ' + (e && e.message || e), false);
        return;
      }
      if (gen !== this._gen) return; // connect() or disconnect() was called meanwhile
      const u = new URL(this.url);
      if (token) u.searchParams.set('token', token);
      const since = this._lastId;
      if (since) u.searchParams.set('since', since);
      let ws;
      try {
        ws = new WebSocket(u.href);
      } catch (e) {
        this._closed(gen, null, String(e && e.message || e), false);
        return;
      }
      this._ws = ws;
      let connected = false;
      ws.onmessage = (ev) => {
        if (this._ws !== ws) return;
        this._lastSeen = Date.now();
        let f;
        try { f = JSON.parse(ev.data); } catch { return; }
        if (!f || typeof f !== 'object') return;
        if (isNotification(f)) {
          if (this._seen.has(f.id)) return;
          this._seen.add(f.id);
          this._order.push(f.id);
          if (this._order.length > SEEN_MAX) this._seen.delete(this._order.shift());
          this._lastId = f.id;
          this._emit('onNotification', f);
        } else if (f.type === 'connection' && f.status === 'connected') {
          connected = true;
          if (this.userId !== null && this.userId !== f.user_id) this.lastId = null; // another user
          this.userId = f.user_id;
          this.connectionId = f.connection_id;
          this.attempts = 0;
          this._startPing(ws);
          this._setState('connected');
          this._emit('onConnect', { userId: f.user_id, connectionId: f.connection_id, resumed: !!since });
        } else if (f.type === 'error' && f.code === 'history_gap') {
          this._emit('onHistoryGap', f);
        } else {
          if (f.type === 'pong') this._pingSentAt = null;
          this._emit('onFrame', f);
        }
      };
      ws.onclose = (ev) => {
        if (this._ws === ws) this._closed(gen, ev.code, ev.reason, connected);
      };
    }

    _startPing(ws) {
      clearInterval(this._timers.ping);
      this._pingSentAt = null;
      this._timers.ping = setInterval(() => {
        if (this._ws !== ws) return;
        // No frame at all (not even the pong) since the last ping: the link is dead.
        if (this._pingSentAt != null && this._lastSeen < this._pingSentAt) {
          this._ws = null;
          ws.onclose = ws.onmessage = null;
          try { ws.close(4000, 'no pong'); } catch { /* ignore */ }
          this._closed(this._gen, 4000, 'no pong', true);
          return;
        }
        this._pingSentAt = null;
        this.ping();
      }, this.options.pingInterval);
    }

    _closed(gen, code, reason, wasConnected) {
      if (gen !== this._gen) return;
      this._teardown();
      this.connectionId = null;
      if (code === 1008) {
        this._setState('stopped');
        this._emit('onStop', { code, reason: reason || '' });
        return;
      }
      // The backoff starts over after a connection that got as far as the connection frame.
      this.attempts = wasConnected ? 1 : this.attempts + 1;
      const o = this.options;
      const cap = Math.min(o.maxBackoff, o.minBackoff * 2 ** Math.min(this.attempts - 1, 20));
      const retryIn = Math.round(cap / 2 + Math.random() * cap / 2); // half fixed, half random
      this.retryAt = Date.now() + retryIn;
      this._timers.retry = setTimeout(() => this._open(gen), retryIn);
      this._setState('disconnected');
      this._emit('onDisconnect', { code, reason: reason || '', retryIn, wasConnected });
    }
  }

  root.Pgdn = { Client, version: 1 };
})(typeof window !== 'undefined' ? window : globalThis);
