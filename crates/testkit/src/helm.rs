//! (being moved here; see the test kit's module table)
