"""The bottom floor: config dataclasses, registry, checkpoint and shard-file I/O, atomic writes, user errors."""
