"""The prefix cache: full KV blocks of earlier requests, found again by the tokens they hold and the
adapter identity they were computed under.

Cached blocks form one trie per :class:`PrefixOwner` (the base model, or one load of one adapter's
weights). A node is one full block; it is found from its parent by the exact tuple of that block's
token ids, so a node is reached only by a request whose every earlier token and whose owner are
equal: keys are compared, never hashed into strings, so nothing can collide. A block may be held by
several requests at once (the allocator counts references); a cached block nobody holds waits in an
LRU list and is evicted when the allocator needs room. Evicting a node drops its whole subtree from
the trie (a descendant can no longer be reached), freeing the descendants nobody holds.

Which tokens a block holds is known only once every one of them has been read back from the device
(with the overlapped loop, the newest token is a placeholder for a step); the scheduler inserts a
request's blocks as they become full and known, so a block is in the trie only after the step that
writes its keys and values has been launched: every step that reads it runs later on the same stream.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

#: one block's token ids
BlockKey = tuple[int, ...]


@dataclass(frozen=True)
class PrefixOwner:
    """Whose keys and values a cached prefix holds: the base model, or one load of an adapter (the
    registry's ``version`` of that load and the adapter's ``identity``, the hash of its weights and
    scaling). The fields are compared one by one, never joined into a string, and requests never
    choose them: the engine derives the owner from the adapter reference its registry resolved."""

    adapter: bool = False
    version: int = 0
    identity: str = ""

    @classmethod
    def of(cls, adapter_ref) -> PrefixOwner:
        if adapter_ref is None:
            return BASE_OWNER
        return cls(adapter=True, version=adapter_ref.version, identity=adapter_ref.identity)


BASE_OWNER = PrefixOwner()


class Node:
    """One cached full block: its id in the KV cache, and the trie around it."""

    __slots__ = ("block", "key", "parent", "children", "owner")

    def __init__(self, block: int, key: BlockKey | None, parent: Node | None, owner: PrefixOwner):
        self.block = block
        self.key = key
        self.parent = parent
        self.children: dict[BlockKey, Node] = {}
        self.owner = owner


class PrefixCache:
    """The trie of cached blocks and the LRU list of those nobody holds.

    The allocator calls :meth:`on_released` when a block's last holder lets go (True: it stays
    cached, else it is free) and :meth:`evict` when it needs blocks; the scheduler calls
    :meth:`match` when a request joins and :meth:`insert` as its blocks fill. Counters feed
    ``/metrics``."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._roots: dict[PrefixOwner, Node] = {}
        self._node_of: dict[int, Node] = {}  # block id -> its node, for every cached block
        self._unheld: OrderedDict[int, None] = OrderedDict()  # cached blocks with no holder, LRU first
        self.queried_tokens = 0  # prompt tokens of requests that looked up a prefix
        self.hit_tokens = 0  # of those, tokens found cached
        self.evicted_blocks = 0

    # -- sizes --------------------------------------------------------------------------------------

    @property
    def num_cached(self) -> int:
        """Blocks in the trie (held or not)."""
        return len(self._node_of)

    @property
    def num_evictable(self) -> int:
        return len(self._unheld)

    def is_cached(self, block: int) -> bool:
        return block in self._node_of

    # -- lookup and insertion (scheduler) -------------------------------------------------------------

    def block_keys(self, token_ids: list[int], num_blocks: int) -> list[BlockKey]:
        bs = self.block_size
        return [tuple(token_ids[i * bs : (i + 1) * bs]) for i in range(num_blocks)]

    def match(self, owner: PrefixOwner, keys: Iterable[BlockKey], touch: bool = True) -> list[Node]:
        """The nodes of the longest cached prefix of ``keys`` computed under ``owner``, first block
        first. With ``touch`` they become the most recently used; the caller must take a reference
        to their blocks before any allocation (which may evict them)."""
        node = self._roots.get(owner)
        nodes: list[Node] = []
        if node is None:
            return nodes
        for key in keys:
            node = node.children.get(key)
            if node is None:
                break
            nodes.append(node)
        if touch:  # the tail first: a prefix's head is the most recently used, so tails go first
            for n in reversed(nodes):
                if n.block in self._unheld:
                    self._unheld.move_to_end(n.block)
        return nodes

    def count_hit(self, queried: int, hit: int) -> None:
        self.queried_tokens += queried
        self.hit_tokens += hit

    def insert(self, owner: PrefixOwner, parent: Node | None, key: BlockKey, block: int) -> Node:
        """Cache ``block`` (held by the caller, full with the tokens ``key``) as the child of ``parent``
        (None: the first block under ``owner``); returns the node the next block hangs from. When the
        same tokens are cached already (another request computed them too), that node is returned and
        ``block`` stays private to its holder."""
        if parent is None:
            parent = self._roots.get(owner)
            if parent is None:
                parent = self._roots[owner] = Node(-1, None, None, owner)
        node = parent.children.get(key)
        if node is not None:
            return node
        if block in self._node_of:
            raise RuntimeError(f"block {block} is cached twice")
        node = parent.children[key] = Node(block, key, parent, owner)
        self._node_of[block] = node
        return node

    def is_attached(self, node: Node) -> bool:
        """Whether ``node`` (a request's last inserted node) is still in the trie."""
        return node.block < 0 or self._node_of.get(node.block) is node

    # -- holders (allocator) ---------------------------------------------------------------------------

    def on_shared(self, block: int) -> None:
        """A holder took ``block`` (a cache hit): it is no longer evictable."""
        self._unheld.pop(block, None)

    def on_released(self, block: int) -> bool:
        """``block`` has no holder any more: True when it stays cached (evictable), False when the
        allocator should free it."""
        if block not in self._node_of:
            return False
        self._unheld[block] = None
        return True

    def evict(self, n: int) -> list[int]:
        """Drop at least ``n`` unheld blocks (least recently used first, with their subtrees) from the
        cache; returns every block freed, for the allocator's free list."""
        freed: list[int] = []
        while len(freed) < n and self._unheld:
            block = next(iter(self._unheld))
            freed += self._drop(self._node_of[block])
        self.evicted_blocks += len(freed)
        return freed

    def flush(self) -> list[int]:
        """Empty the cache; returns the unheld blocks (now free). Held blocks stay with their holders,
        uncached."""
        freed = list(self._unheld)
        self._unheld.clear()
        self._node_of.clear()
        for root in self._roots.values():
            _detach_all(root)
        self._roots.clear()
        return freed

    def _drop(self, node: Node) -> list[int]:
        """Take ``node`` and its subtree out of the trie; returns their unheld blocks."""
        del node.parent.children[node.key]
        if not node.parent.children and node.parent.parent is None:
            self._roots.pop(node.parent.owner, None)
        freed = []
        stack = [node]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            n.children = {}
            del self._node_of[n.block]
            if n.block in self._unheld:
                del self._unheld[n.block]
                freed.append(n.block)
        return freed

    # -- checks ----------------------------------------------------------------------------------------

    def check_integrity(self, refs: dict[int, int]) -> None:
        """Raise unless the trie, the block map and the LRU list agree: every node reachable from a
        root is mapped, every mapped block is in the trie once, and exactly the mapped blocks with no
        reference are evictable."""
        seen: set[int] = set()
        for owner, root in self._roots.items():
            if root.owner != owner:
                raise RuntimeError("a prefix root is filed under another owner")
            stack = list(root.children.values())
            while stack:
                n = stack.pop()
                if n.block in seen:
                    raise RuntimeError(f"block {n.block} appears twice in the prefix cache")
                if self._node_of.get(n.block) is not n or n.owner != owner:
                    raise RuntimeError(f"prefix-cache node of block {n.block} is not mapped to its block")
                if n.key is None or len(n.key) != self.block_size or n.parent.children.get(n.key) is not n:
                    raise RuntimeError(f"prefix-cache node of block {n.block} has a wrong key")
                seen.add(n.block)
                stack.extend(n.children.values())
        if seen != self._node_of.keys():
            raise RuntimeError(f"{len(self._node_of.keys() - seen)} cached blocks are not reachable in the trie")
        unheld = {b for b in seen if not refs.get(b)}
        if unheld != self._unheld.keys():
            raise RuntimeError(
                f"evictable blocks differ from the unheld cached ones: {sorted(unheld ^ self._unheld.keys())[:10]}"
            )


def _detach_all(root: Node) -> None:
    stack = [root]
    while stack:
        n = stack.pop()
        stack.extend(n.children.values())
        n.children = {}
