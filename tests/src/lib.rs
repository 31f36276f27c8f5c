//! Shared helpers live in the test binary.
