//! Model code kept in this crate (see each module for why).

pub(crate) mod qwen2;
