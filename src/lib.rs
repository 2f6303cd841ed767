pub mod config;
pub mod http;
