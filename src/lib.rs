//! beitv2: BEiT v1/v2 image models in Rust on candle.
//!
//! The crate is laid out like the architecture: [`model`] (backbone, attention,
//! relative position bias), [`checkpoint`] (timm / mmpretrain / unilm formats),
//! [`data`] (decoding, Pillow-exact resizing, eval transforms) and the `beitv2`
//! command line in [`cli`].

pub mod checkpoint;
pub mod cli;
pub mod data;
#[doc(hidden)]
pub mod fuzz;
pub mod hub;
pub mod kernels;
pub mod model;
pub mod report;
pub mod train;
pub mod util;
