//! seaport-proto: the sans-io core of seaport.
pub mod frame;
pub mod keys;
pub mod noise;
pub mod range;
pub mod role;
pub mod message;
pub mod session;
pub mod client;
pub mod registry;
