"""Sequence-parallel runtime: exact Ulysses / ring / hybrid attention on packed variable-length batches."""

from sp.attention import attention
from sp.context import SPContext
from sp.groups import GroupPool
from sp.layout import GroupLayout, shard, unshard

__all__ = ["GroupLayout", "GroupPool", "SPContext", "attention", "shard", "unshard"]
