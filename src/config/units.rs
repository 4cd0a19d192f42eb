//! Human units in the config file: durations (`250ms`, `2s`, `1m`, `1h`) and sizes
//! (`512`, `64KiB`, `1MiB`, `2GiB`, also `KB`/`MB`/`GB` as powers of ten). Both parse
//! once at load time into plain numbers; the request path never sees the strings.
//! There is one definition for the whole project, in the plugin crate (plugins cannot
//! depend on the gateway; the gateway depends on plugins), so plugin settings and the
//! gateway's own keys read units the same way.

pub use portico_plugins::units::{parse_duration, Dur, Size};
