"""The Redis store's scripts: each check-and-write runs atomically inside Redis, so replicas cannot interleave.

Keys under a prefix ``P``: ``P s:<id>`` the record (expires after the TTL),
``P l:<id>`` the lease (the holder's fencing token; expires unless renewed),
``P fence`` the token counter, ``P lru`` (sorted set: id by last use, ms),
``P size`` (hash: id -> record bytes), ``P bytes`` (their total) and
``P evictions``. Sessions whose record expired are dropped from the index
lazily: they are the least recently used, so the eviction walk meets them
first. Scripts name keys built from ids, so this needs a standalone Redis
(not Redis Cluster).
"""

from __future__ import annotations

_HELPERS = """
local P = ARGV[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function forget(sid)
  local size = tonumber(redis.call('HGET', P .. 'size', sid) or '0')
  redis.call('HDEL', P .. 'size', sid)
  redis.call('ZREM', P .. 'lru', sid)
  redis.call('INCRBY', P .. 'bytes', -size)
end
local function index(sid, size)
  local old = tonumber(redis.call('HGET', P .. 'size', sid) or '0')
  redis.call('HSET', P .. 'size', sid, size)
  redis.call('ZADD', P .. 'lru', now_ms(), sid)
  redis.call('INCRBY', P .. 'bytes', size - old)
end
-- idle sessions out, least recently used first, until the budget holds; expired records are only forgotten
local function evict(keep, max_bytes)
  local evicted = 0
  local total = tonumber(redis.call('GET', P .. 'bytes') or '0')
  if total <= max_bytes then return 0 end
  for _, sid in ipairs(redis.call('ZRANGE', P .. 'lru', 0, -1)) do
    if total <= max_bytes then break end
    if sid ~= keep then
      local gone = redis.call('EXISTS', P .. 's:' .. sid) == 0
      if gone or redis.call('EXISTS', P .. 'l:' .. sid) == 0 then
        total = total - tonumber(redis.call('HGET', P .. 'size', sid) or '0')
        redis.call('DEL', P .. 's:' .. sid)
        forget(sid)
        if not gone then evicted = evicted + 1 end
      end
    end
  end
  redis.call('INCRBY', P .. 'evictions', evicted)
  return evicted
end
"""

# ARGV: prefix, id, record, ttl_ms, max_bytes -> 1 (created)
CREATE = _HELPERS + """
local sid = ARGV[2]
redis.call('SET', P .. 's:' .. sid, ARGV[3], 'PX', ARGV[4])
index(sid, string.len(ARGV[3]))
evict(sid, tonumber(ARGV[5]))
return 1
"""

# ARGV: prefix, id, lease_ms, hold_ms -> {0} missing | {-1, record} busy | {token, record} leased
LEASE = _HELPERS + """
local sid = ARGV[2]
local record = redis.call('GET', P .. 's:' .. sid)
if not record then return {0} end
if redis.call('EXISTS', P .. 'l:' .. sid) == 1 then return {-1, record} end
local token = redis.call('INCR', P .. 'fence')
redis.call('SET', P .. 'l:' .. sid, token, 'PX', ARGV[3])
redis.call('PEXPIRE', P .. 's:' .. sid, ARGV[4])
redis.call('ZADD', P .. 'lru', now_ms(), sid)
return {token, record}
"""

# ARGV: prefix, id, token, lease_ms, hold_ms -> 1 renewed | 0 the lease is not ours any more
RENEW = _HELPERS + """
local sid = ARGV[2]
if redis.call('GET', P .. 'l:' .. sid) ~= ARGV[3] then return 0 end
redis.call('PEXPIRE', P .. 'l:' .. sid, ARGV[4])
redis.call('PEXPIRE', P .. 's:' .. sid, ARGV[5])
return 1
"""

# ARGV: prefix, id, token, record ('' to keep the stored one), ttl_ms, max_bytes
#   -> 1 written (or released) | -1 fenced: the lease is not the writer's | -2 alone over the budget (removed)
WRITE_BACK = _HELPERS + """
local sid = ARGV[2]
if redis.call('GET', P .. 'l:' .. sid) ~= ARGV[3] then return -1 end
redis.call('DEL', P .. 'l:' .. sid)
if redis.call('EXISTS', P .. 's:' .. sid) == 0 then forget(sid) return 1 end
local record = ARGV[4]
if record == '' then
  redis.call('PEXPIRE', P .. 's:' .. sid, ARGV[5])
  redis.call('ZADD', P .. 'lru', now_ms(), sid)
  return 1
end
if string.len(record) > tonumber(ARGV[6]) then
  redis.call('DEL', P .. 's:' .. sid)
  forget(sid)
  return -2
end
redis.call('SET', P .. 's:' .. sid, record, 'PX', ARGV[5])
index(sid, string.len(record))
evict(sid, tonumber(ARGV[6]))
return 1
"""

# ARGV: prefix, id -> 1 deleted | 0 missing | -1 busy
DELETE = _HELPERS + """
local sid = ARGV[2]
if redis.call('EXISTS', P .. 's:' .. sid) == 0 then forget(sid) return 0 end
if redis.call('EXISTS', P .. 'l:' .. sid) == 1 then return -1 end
redis.call('DEL', P .. 's:' .. sid)
forget(sid)
return 1
"""

# ARGV: prefix, ttl_ms -> sessions forgotten: index entries idle past the TTL whose record has expired
PRUNE = _HELPERS + """
local forgotten = 0
for _, sid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'lru', '-inf', now_ms() - tonumber(ARGV[2]))) do
  if redis.call('EXISTS', P .. 's:' .. sid) == 0 then
    forget(sid)
    forgotten = forgotten + 1
  end
end
redis.call('INCRBY', P .. 'evictions', forgotten)
return forgotten
"""
