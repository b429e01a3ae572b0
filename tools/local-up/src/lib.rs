//! (being moved here from the test package)
