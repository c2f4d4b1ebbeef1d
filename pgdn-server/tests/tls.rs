//! TLS end to end (filled in below).
