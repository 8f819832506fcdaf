"""AFS: a replicated configuration filesystem (Raft cluster + read-only FUSE replicas)."""

__version__ = "0.1.0"
