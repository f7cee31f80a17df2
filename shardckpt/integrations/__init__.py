"""Where shardckpt meets the tools users already have. Each integration is a subpackage
that imports its framework only when the user imports it (``shardckpt.integrations.lightning``)."""
