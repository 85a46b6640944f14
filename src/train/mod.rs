//! Training: optimiser, schedules, loops, checkpoints, plots.

pub mod plot;
