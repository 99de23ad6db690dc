//! End-to-end tests: the real server on port 0, a mock upstream on port 0, real clients.

#![allow(clippy::disallowed_methods)]

mod accounts;
mod admin;
mod audit_log;
mod bench_smoke;
mod cache;
mod deploy_files;
mod docs;
mod durability;
mod governance;
mod limits;
mod openai_sdk;
mod openapi_contract;
mod patrons;
mod prices;
mod proxy;
mod quota;
mod replicas;
mod reports;
mod routing;
mod safeguards;
mod serve;
mod signing;
mod sponsors;
mod tenancy;
mod transport;
