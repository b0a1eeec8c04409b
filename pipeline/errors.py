"""Errors the data side raises; each message names the problem and the fix."""


class SourceError(ValueError):
    """A source name, its config, or its input files are wrong."""


class ShardFormatError(ValueError):
    """A shard directory is missing, incomplete, or not in a format this version reads."""
