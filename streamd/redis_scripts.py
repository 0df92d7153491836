"""The run store's server-side scripts: a batch's claim check and its end, each one Redis command.

Admitting a batch of N runs is N payload ``SET``s plus a ``ZADD`` and an ``HSET``;
ending it is N ``ended`` markers plus a ``ZREM``, a ``DEL`` and an ``HDEL``. As a
pipeline, every one of those commands is packed by redis-py and its reply parsed
one by one: about 1 ms of the daemon's CPU per batch of 32 at the claim check
alone, in the hand-off thread, which shares the GIL with faust's event loop
(docs/performance.md, sixth round). As one ``EVALSHA`` the client packs one
command and parses one reply; Redis runs the same writes, with the same TTLs,
atomically.

Every key a script touches is passed in ``KEYS`` (the keys of a topology do not
share a hash slot, so the run store needs a standalone Redis or a primary with
replicas, as it always has; not Redis Cluster). The Redis user needs the
``@scripting`` commands (``EVALSHA``, ``SCRIPT LOAD``); redis-py loads a script
again by itself after a Redis restart (``NOSCRIPT``).
"""

from __future__ import annotations

__all__ = ["ADMIT", "FINISH"]

#: A Lua helper: ``chunked(command, key or nil, list)`` sends ``list`` to Redis in chunks (of an even
#: length: pairs stay together), so a batch of any size stays under Lua's limit on one call's arguments.
_CHUNKED = """
local function chunked(cmd, key, items)
  local step = 4000
  for i = 1, #items, step do
    local last = math.min(i + step - 1, #items)
    if key then redis.call(cmd, key, unpack(items, i, last)) else redis.call(cmd, unpack(items, i, last)) end
  end
end
"""

#: KEYS: the ``bytes`` hash, then per run its ``frame`` key and its topic's ``inflight`` key.
#: ARGV: the payload TTL in ms, then per run: payload, in-flight member, in-flight score, run id.
ADMIT = _CHUNKED + """
local ttl = ARGV[1]
local inflight, order, sizes = {}, {}, {}
for k = 0, (#KEYS - 1) / 2 - 1 do
  local payload, member, score, run_id = ARGV[2 + 4 * k], ARGV[3 + 4 * k], ARGV[4 + 4 * k], ARGV[5 + 4 * k]
  redis.call('SET', KEYS[2 + 2 * k], payload, 'PX', ttl)
  local key = KEYS[3 + 2 * k]
  if inflight[key] == nil then inflight[key] = {}; order[#order + 1] = key end
  local z = inflight[key]
  z[#z + 1] = score
  z[#z + 1] = member
  sizes[#sizes + 1] = run_id
  sizes[#sizes + 1] = #payload
end
for _, key in ipairs(order) do chunked('ZADD', key, inflight[key]) end
if #sizes > 0 then chunked('HSET', KEYS[1], sizes) end
return #sizes / 2
"""

#: KEYS: the ``bytes`` hash, then per run its ``ended``, ``frame`` and topic's ``inflight`` key; then any
#: further keys to delete (the batch's joins, outputs and sink set).
#: ARGV: the ``ended`` marker's TTL in ms, then per run: in-flight member, run id.
FINISH = _CHUNKED + """
local ttl = ARGV[1]
local n = (#ARGV - 1) / 2
local inflight, order, gone, ids = {}, {}, {}, {}
for k = 0, n - 1 do
  redis.call('SET', KEYS[2 + 3 * k], '1', 'PX', ttl)
  gone[#gone + 1] = KEYS[3 + 3 * k]
  local key = KEYS[4 + 3 * k]
  if inflight[key] == nil then inflight[key] = {}; order[#order + 1] = key end
  local z = inflight[key]
  z[#z + 1] = ARGV[2 + 2 * k]
  ids[#ids + 1] = ARGV[3 + 2 * k]
end
for i = 2 + 3 * n, #KEYS do gone[#gone + 1] = KEYS[i] end  -- the payloads, then the batch's own keys
for _, key in ipairs(order) do chunked('ZREM', key, inflight[key]) end
if #gone > 0 then chunked('DEL', nil, gone) end
if #ids > 0 then chunked('HDEL', KEYS[1], ids) end
return n
"""
