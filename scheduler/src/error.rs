//! Errors: bad input or a plan that does not match the snapshot. "No node fits" is not
//! an error; it is a [`PlacementFailure`](crate::PlacementFailure) in the plan.

use std::fmt;

use crate::model::{FunctionId, NodeId};

/// Something is wrong with the input, not with the cluster's capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Two nodes in the snapshot have the same id.
    DuplicateNode {
        /// The id.
        node: NodeId,
    },
    /// Two desired functions have the same id.
    DuplicateFunction {
        /// The id.
        function: FunctionId,
    },
    /// Two replicas of one function are on one node.
    DuplicateReplica {
        /// The function.
        function: FunctionId,
        /// The node.
        node: NodeId,
    },
    /// A function's minimum replica count is above its maximum.
    InvalidScaleBounds {
        /// The function.
        function: FunctionId,
        /// Its minimum.
        min: u32,
        /// Its maximum.
        max: u32,
    },
    /// A plan names a node the snapshot does not have.
    UnknownNode {
        /// The node.
        node: NodeId,
    },
    /// A plan stops or moves a replica the snapshot does not have.
    UnknownReplica {
        /// The function.
        function: FunctionId,
        /// The node.
        node: NodeId,
    },
    /// A plan places a replica where the function already has one.
    ReplicaExists {
        /// The function.
        function: FunctionId,
        /// The node.
        node: NodeId,
    },
    /// A plan asks a node for more than it has free.
    OverCapacity {
        /// The node.
        node: NodeId,
        /// `cpu`, `memory` or `accelerator-memory`.
        resource: &'static str,
    },
    /// A plan names an accelerator the node does not have.
    UnknownAccelerator {
        /// The node.
        node: NodeId,
        /// The accelerator's index.
        index: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::DuplicateNode { node } => {
                write!(f, "node `{node}` appears twice in the snapshot")
            }
            Error::DuplicateFunction { function } => {
                write!(
                    f,
                    "function `{function}` appears twice in the desired state"
                )
            }
            Error::DuplicateReplica { function, node } => {
                write!(f, "function `{function}` has two replicas on node `{node}`")
            }
            Error::InvalidScaleBounds { function, min, max } => {
                write!(
                    f,
                    "function `{function}` has min replicas {min:?} above max {max:?}"
                )
            }
            Error::UnknownNode { node } => write!(f, "plan names unknown node `{node}`"),
            Error::UnknownReplica { function, node } => {
                write!(f, "plan names no replica of `{function}` on node `{node}`")
            }
            Error::ReplicaExists { function, node } => {
                write!(
                    f,
                    "function `{function}` already has a replica on node `{node}`"
                )
            }
            Error::OverCapacity { node, resource } => {
                write!(f, "plan puts node `{node}` over its free {resource}")
            }
            Error::UnknownAccelerator { node, index } => {
                write!(f, "node `{node}` has no accelerator {index:?}")
            }
        }
    }
}

impl std::error::Error for Error {}
