/*! pgdn.js: the browser client of pgdn. Plain JS, no build step, no dependencies.
 *
 * Load it with <script src="/pgdn.js"></script> (every pgdn server serves it);
 * it defines window.Pgdn. Wire contract: docs/protocol.md.
 *
 *   const client = new Pgdn.Client({
 *     url: '/ws',                  // relative, or absolute ws(s):// or http(s):// URL
 *     sseUrl: null,                // the SSE endpoint; default: url's last path segment
 *                                  // replaced by 'sse' ('/ws' -> '/sse', '/rt/ws' -> '/rt/sse')
 *     transport: 'auto',           // 'auto' | 'websocket' | 'sse' (see below)
 *     token: 'jwt',                // or a function returning a token or a Promise of one,
 *                                  // called before every attempt and before the token expires;
 *                                  // whitespace around it is ignored (a trailing newline)
 *     onNotification(n) {},        // {id, type, payload, timestamp, user_id?, group_ids?}, each id once
 *     onConnect({userId, connectionId, resumed, transport}) {},  // resumed: it sent since=<lastId>
 *     onDisconnect({code, reason, retryIn, wasConnected}) {},  // it reconnects in retryIn ms
 *     onStop({code, reason}) {},   // closed with 1008 (bad token, kicked, rate limit), or the
 *                                  // SSE endpoint answered 401/403: no retry
 *     onHistoryGap(frame) {},      // the server could not replay all that was missed: refetch
 *     onFrame(f) {},               // any other frame: pong, refreshed, error (e.g. code
 *                                  // refresh_failed), a handler's reply
 *     onStateChange(state) {},     // 'connecting' is reported on every attempt
 *     pingInterval: 25000,         // ms between pings; no answer to one by the next = dead link
 *     minBackoff: 500,             // the first retry waits minBackoff/2 to minBackoff ms ...
 *     maxBackoff: 30000,           // ... doubling per failed attempt up to maxBackoff/2 to maxBackoff
 *     refreshMargin: 30000,        // refresh this long before the token expires (at most a
 *                                  // third of the time it has left)
 *     since: null,                 // resume from this message id on the first connect
 *   });
 *   client.connect();     // (re)connects now; again after onStop, e.g. with a new token
 *   client.disconnect();  // closes and stays closed (state 'idle')
 *   client.send(obj);     // sends a frame (objects as JSON); false when not connected or on SSE
 *   client.ping();        // sends a ping now; the pong goes to onFrame
 *   client.retryNow();    // while waiting to reconnect: try at once
 *   client.state          // 'idle' | 'connecting' | 'connected' | 'disconnected' | 'stopped'
 *   client.transport      // 'websocket' | 'sse' while connected, else null
 *   client.lastId         // id of the last notification (settable, e.g. restored from storage)
 *   client.expiresAt      // ms epoch at which the connection's token expires (JWT exp), or null
 *   client.userId, client.connectionId, client.attempts, client.retryAt, client.url, client.sseUrl
 *
 * After any close except 1008 it reconnects with exponential backoff and jitter
 * (also when the token function fails: the error is the reason in onDisconnect),
 * sending since=<lastId> so that the server replays what was published meanwhile;
 * ids already seen are dropped. A close with 1008 stops it until connect() is
 * called again. A local 'no pong' close is reported as code 4000. While it
 * waits to reconnect, the browser's 'online' event makes it try at once.
 *
 * Token lifetime: when the token is a function and a JSON Web Token (its `exp`
 * is read locally, corrected by the server's clock from the connection frame),
 * the client asks the function for a new one refreshMargin before it expires and
 * sends {"type":"refresh","token":...} on the open WebSocket; the server's
 * `refreshed` (or `refresh_failed` error) frame goes to onFrame. If the server
 * closes with 4001 (token expired: no refresh, or it failed), the client calls
 * the function and reconnects at once with since=, so nothing is lost (with the
 * usual backoff instead if the connection lived less than a second, e.g. the
 * function keeps returning an expired token). A fixed string token is never
 * refreshed: after 4001 the reconnect with it ends in 1008.
 *
 * Transports: 'websocket' and 'sse' use only that one. 'auto' starts every
 * attempt (the first connect and each reconnect) with a WebSocket; when that
 * cannot open (an error before the handshake completed, e.g. a proxy that
 * refuses the upgrade), the same attempt goes on at once over Server-Sent
 * Events (EventSource, docs/protocol.md section 7). So it goes back to WebSocket as
 * soon as the network lets it, and behind a proxy that refuses upgrades each
 * (re)connect costs one refused handshake. The resume point (lastId) is shared
 * by both transports. SSE is receive-only: send() and ping() return false, the
 * token is not refreshed in-band (the server ends the stream with 4001 at
 * expiry and the client reconnects at once with a fresh token and since=), and
 * the server's keepalive comments are invisible to the page, so there are no
 * pings. The client does its own reconnects on SSE too (it closes the
 * EventSource on any error, so the browser's automatic reconnect never runs):
 * one policy (backoff, fresh token, since=) for both. An EventSource cannot see
 * an HTTP status: when the server refuses the stream, the client fetches the
 * same URL once to learn why; 401 or 403 stop it like 1008 (with the server's
 * reason), anything else is retried.
 */
(function (root) {
  'use strict';

  const SEEN_MAX = 1000; // ids remembered to drop duplicates
  const TRANSPORTS = ['auto', 'websocket', 'sse'];
  const MAX_TIMEOUT = 0x7fffffff; // setTimeout's longest delay (about 24.8 days)

  function isNotification(f) {
    return typeof f.id === 'string' && typeof f.type === 'string' &&
      typeof f.timestamp === 'string' && !!f.payload && typeof f.payload === 'object';
  }

  // The `exp` claim of a JWT as ms epoch, or null (an opaque token, no exp).
  // Read locally for scheduling only: the server verifies the token.
  function tokenExpiry(token) {
    if (typeof token !== 'string') return null;
    const parts = token.split('.');
    if (parts.length !== 3) return null;
    try {
      let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
      b64 += '='.repeat((4 - b64.length % 4) % 4);
      const claims = JSON.parse(atob(b64));
      return claims && typeof claims.exp === 'number' ? claims.exp * 1000 : null;
    } catch { return null; }
  }

  function errorText(e) { return String(e && e.message || e); }

  // A token as given, without the whitespace around it (a token pasted or
  // fetched with a trailing newline is still the same token).
  function cleanToken(token) { return typeof token === 'string' ? token.trim() : token; }

  class Client {
    constructor(options) {
      const o = Object.assign({
        url: '/ws', sseUrl: null, transport: 'auto', pingInterval: 25000,
        minBackoff: 500, maxBackoff: 30000, refreshMargin: 30000,
      }, options);
      if (!TRANSPORTS.includes(o.transport)) {
        throw new TypeError("pgdn: transport must be 'auto', 'websocket' or 'sse'");
      }
      this.options = o;
      const base = typeof location !== 'undefined' ? location.href : undefined;
      const u = new URL(o.url, base);
      if (u.protocol === 'http:') u.protocol = 'ws:';
      if (u.protocol === 'https:') u.protocol = 'wss:';
      this.url = u.href;            // the WebSocket endpoint, without token
      const h = new URL(u.href);
      h.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
      const s = o.sseUrl ? new URL(o.sseUrl, base) : new URL('sse', h);
      if (!o.sseUrl) s.search = h.search;
      this.sseUrl = s.href;         // the Server-Sent Events endpoint, without token
      this.state = 'idle';
      this.transport = null;        // 'websocket' | 'sse' while connected
      this.expiresAt = null;        // ms epoch at which the connection's token expires
      this.userId = null;
      this.connectionId = null;
      this.attempts = 0;            // failed attempts in a row
      this.retryAt = null;          // ms epoch of the next attempt while 'disconnected'
      this._lastId = o.since || null;
      this._seen = new Set();
      this._order = [];
      // The current attempt: {gen, token, since, ws | es, opened, connected, refreshing}.
      this._conn = null;
      this._gen = 0;                // bumped on connect()/disconnect(): stale callbacks see a mismatch
      this._timers = {};
      this._skew = 0;               // the server's clock minus ours, from the connection frame
      this._connectedAt = 0;
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
      const c = this._conn;
      if (!c || !c.ws || c.ws.readyState !== 1 || this.state !== 'connected') return false;
      c.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
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
      clearTimeout(this._timers.refresh);
      this._timers = {};
      this.retryAt = null;
      this.transport = null;
      this.expiresAt = null;
      const c = this._conn;
      this._conn = null;
      if (c) this._release(c, 1000);
    }

    // Detaches from an attempt's socket or stream and closes it.
    _release(c, code, reason) {
      const { ws, es } = c;
      if (ws) {
        ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
        try { ws.close(code, reason); } catch { /* already closed */ }
      }
      if (es) {
        es.onopen = es.onmessage = es.onerror = null;
        es.close();
      }
    }

    _endpoint(base, token) {
      const u = new URL(base);
      if (token) u.searchParams.set('token', token);
      if (this._lastId) u.searchParams.set('since', this._lastId);
      return u.href;
    }

    async _open(gen) {
      this.retryAt = null;
      this.state = 'connecting';
      this._emit('onStateChange', 'connecting'); // on every attempt
      let token;
      try {
        const t = this.options.token;
        token = cleanToken(typeof t === 'function' ? await t() : t);
      } catch (e) {
        if (gen === this._gen) this._closed(gen, null, 'token: ' + errorText(e), false);
        return;
      }
      if (gen !== this._gen) return; // connect() or disconnect() was called meanwhile
      if (this.options.transport === 'sse') this._openSse(gen, token, null);
      else this._openWs(gen, token);
    }

    _openWs(gen, token) {
      const c = { gen, token, since: this._lastId, opened: false, connected: false };
      try {
        c.ws = new WebSocket(this._endpoint(this.url, token));
      } catch (e) {
        this._wsFailed(c, null, errorText(e));
        return;
      }
      this._conn = c;
      c.ws.onopen = () => { c.opened = true; };
      c.ws.onmessage = (ev) => { if (this._conn === c) this._onData(c, ev.data); };
      c.ws.onclose = (ev) => {
        if (this._conn !== c) return;
        if (c.opened) this._closed(gen, ev.code, ev.reason, c.connected);
        else this._wsFailed(c, ev.code, ev.reason);
      };
    }

    // A WebSocket that could not open: with 'auto', the attempt goes on over SSE.
    _wsFailed(c, code, reason) {
      if (this.options.transport !== 'auto') {
        this._closed(c.gen, code, reason, false);
        return;
      }
      if (this._conn === c) this._conn = null;
      this._release(c);
      this._openSse(c.gen, c.token, { code, reason });
    }

    // wsFailure: how the WebSocket of this attempt failed ('auto'), reported
    // if the stream cannot open either.
    _openSse(gen, token, wsFailure) {
      const failed = (reason) => wsFailure
        ? this._closed(gen, wsFailure.code, wsFailure.reason || reason, false)
        : this._closed(gen, null, reason, false);
      if (typeof EventSource !== 'function') { failed('no EventSource in this browser'); return; }
      const url = this._endpoint(this.sseUrl, token);
      const c = { gen, token, since: this._lastId, opened: false, connected: false };
      try {
        c.es = new EventSource(url);
      } catch (e) {
        failed(errorText(e));
        return;
      }
      this._conn = c;
      c.es.onopen = () => { c.opened = true; };
      c.es.onmessage = (ev) => { if (this._conn === c) this._onData(c, ev.data); };
      c.es.onerror = () => {
        if (this._conn !== c) return;
        // CLOSED: the server answered, but not with a stream (an HTTP error).
        // Otherwise a network error or the end of the stream, after which
        // the browser would reconnect by itself: this client does instead.
        const refused = c.es.readyState === 2;
        this._conn = null;
        this._release(c);
        if (c.opened) this._closed(gen, null, 'stream ended', c.connected);
        else if (refused) this._whyRefused(c, url);
        else failed('connection failed');
      };
    }

    // An EventSource does not show the HTTP status of a refusal: asks once.
    async _whyRefused(c, url) {
      let status = 0;
      let reason = '';
      const abort = typeof AbortController === 'function' ? new AbortController() : null;
      try {
        const res = await fetch(url, {
          headers: { Accept: 'text/event-stream' }, cache: 'no-store', signal: abort && abort.signal,
        });
        status = res.status;
        if (!res.ok) {
          const body = await res.json().catch(() => null);
          if (body && typeof body.error === 'string') reason = body.error;
        }
      } catch { /* a network error: status 0 */ }
      if (abort) abort.abort(); // a stream that did open this time is not read
      if (c.gen !== this._gen) return;
      if (status === 401 || status === 403) {
        this._closed(c.gen, 1008, reason || 'HTTP ' + status, false);
      } else {
        const text = status ? 'HTTP ' + status + (reason ? ': ' + reason : '') : 'connection failed';
        this._closed(c.gen, null, text, false);
      }
    }

    _onData(c, data) {
      this._lastSeen = Date.now();
      let f;
      try { f = JSON.parse(data); } catch { return; }
      if (!f || typeof f !== 'object') return;
      if (isNotification(f)) {
        if (this._seen.has(f.id)) return;
        this._seen.add(f.id);
        this._order.push(f.id);
        if (this._order.length > SEEN_MAX) this._seen.delete(this._order.shift());
        this._lastId = f.id;
        this._emit('onNotification', f);
      } else if (f.type === 'connection' && f.status === 'connected') {
        this._connected(c, f);
      } else if (f.type === 'close' && c.es && typeof f.code === 'number') {
        // SSE: where a WebSocket would be closed with a code, the stream says so and ends.
        this._closed(c.gen, f.code, f.reason, c.connected);
      } else if (f.type === 'error' && f.code === 'history_gap') {
        this._emit('onHistoryGap', f);
      } else {
        if (f.type === 'pong') this._pingSentAt = null;
        if (f.type === 'refreshed') this._refreshed(c);
        if (f.type === 'error' && f.code === 'refresh_failed') c.refreshing = null;
        this._emit('onFrame', f);
      }
    }

    _connected(c, f) {
      c.connected = true;
      this._connectedAt = Date.now();
      const serverNow = Date.parse(f.timestamp);
      if (!isNaN(serverNow)) this._skew = serverNow - this._connectedAt;
      if (this.userId !== null && this.userId !== f.user_id) this.lastId = null; // another user
      this.userId = f.user_id;
      this.connectionId = f.connection_id;
      this.attempts = 0;
      this.transport = c.ws ? 'websocket' : 'sse';
      if (c.ws) this._startPing(c);
      this._scheduleRefresh(c);
      this._setState('connected');
      this._emit('onConnect', {
        userId: f.user_id, connectionId: f.connection_id, resumed: !!c.since, transport: this.transport,
      });
    }

    // Refreshes the connection's token refreshMargin (at most a third of the
    // time left) before it expires: on a WebSocket, with a token function.
    _scheduleRefresh(c) {
      clearTimeout(this._timers.refresh);
      const exp = tokenExpiry(c.token);
      this.expiresAt = exp;
      if (exp == null || !c.ws || typeof this.options.token !== 'function') return;
      const left = exp - (Date.now() + this._skew);
      const delay = Math.max(0, left - Math.min(this.options.refreshMargin, left / 3));
      this._timers.refresh = delay > MAX_TIMEOUT
        ? setTimeout(() => this._scheduleRefresh(c), MAX_TIMEOUT)
        : setTimeout(() => this._refresh(c), delay);
    }

    async _refresh(c) {
      if (this._conn !== c) return;
      let token;
      try {
        token = await this.options.token();
      } catch (e) {
        // The server closes with 4001 at expiry; the reconnect asks again.
        console.warn('pgdn: the token function failed, not refreshing', e);
        return;
      }
      token = cleanToken(token);
      if (this._conn !== c || !token) return;
      c.refreshing = token;
      if (!this.send({ type: 'refresh', token })) c.refreshing = null;
    }

    _refreshed(c) {
      const token = c.refreshing;
      c.refreshing = null;
      if (!token) return;
      const before = tokenExpiry(c.token);
      c.token = token;
      // A token that expires no later than the old one is not refreshed
      // again (that could loop): the 4001 at its expiry gets a fresh one.
      if (before == null || (tokenExpiry(token) || 0) > before) this._scheduleRefresh(c);
      else this.expiresAt = tokenExpiry(token);
    }

    _startPing(c) {
      clearInterval(this._timers.ping);
      this._pingSentAt = null;
      this._timers.ping = setInterval(() => {
        if (this._conn !== c) return;
        // No frame at all (not even the pong) since the last ping: the link is dead.
        if (this._pingSentAt != null && this._lastSeen < this._pingSentAt) {
          this._conn = null;
          this._release(c, 4000, 'no pong');
          this._closed(c.gen, 4000, 'no pong', true);
          return;
        }
        this._pingSentAt = null;
        this.ping();
      }, this.options.pingInterval);
    }

    _closed(gen, code, reason, wasConnected) {
      if (gen !== this._gen) return;
      const lived = wasConnected ? Date.now() - this._connectedAt : 0;
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
      let retryIn;
      if (code === 4001 && lived >= 1000) {
        retryIn = 0; // token expired: a fresh one and since=, at once
      } else {
        const cap = Math.min(o.maxBackoff, o.minBackoff * 2 ** Math.min(this.attempts - 1, 20));
        retryIn = Math.round(cap / 2 + Math.random() * cap / 2); // half fixed, half random
      }
      this.retryAt = Date.now() + retryIn;
      this._timers.retry = setTimeout(() => this._open(gen), retryIn);
      this._setState('disconnected');
      this._emit('onDisconnect', { code, reason: reason || '', retryIn, wasConnected });
    }
  }

  root.Pgdn = { Client, version: 1 };
})(typeof window !== 'undefined' ? window : globalThis);
