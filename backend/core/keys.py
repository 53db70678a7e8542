"""The prefix of every Redis key this backend writes."""

PREFIX = "dws"
