//! Shared bits of the pgdn examples (none yet).
