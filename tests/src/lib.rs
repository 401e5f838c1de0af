pub mod agent;
pub mod receiver;
