//! The job kinds that ship with cairn.
//!
//! - [`analytics`]: `analytics.rollup`, DAU/WAU/MAU stored for finished days.

pub mod analytics;

pub use analytics::AnalyticsRollup;
