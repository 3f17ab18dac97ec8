//! Placement of Lepton functions on cloud and edge nodes (see issue: the scheduler crate).
