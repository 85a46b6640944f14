//! PNG line plots of training curves.
