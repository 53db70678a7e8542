"""Label Studio ML backend for DiffewS: protocol, support store, RQ jobs and workers."""
