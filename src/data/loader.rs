//! Parallel, deterministic, resumable batch loading.
