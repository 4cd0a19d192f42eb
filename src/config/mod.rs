//! The configuration: the YAML model (`model`), human units (`units`), loading with
//! positioned errors (`load`) and whole-file validation (`validate`).

pub mod load;
pub mod model;
pub mod units;
pub mod validate;

pub use load::{load_file, load_str, ConfigError};
pub use model::Config;
