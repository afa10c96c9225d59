-- Keeps a kind's index of live leases (see lease.lua) in Cluster mode, where it lives in another
-- slot than the record and lease.lua cannot: the agent calls this after a lease.lua that granted
-- or ended a lease. An entry missed (an agent that died in between) is written again by the
-- lease's next renewal.
--
-- KEYS[1]  the kind's index.
-- ARGV[1]  the election's name.
-- ARGV[2]  milliseconds left of its lease; 0: it ended.
-- ARGV[3]  retention in milliseconds (see lease.lua).
-- Returns 1.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl, retention = tonumber(ARGV[2]), tonumber(ARGV[3])
local ended = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 8)
if #ended > 0 then
  redis.call('ZREM', KEYS[1], unpack(ended))
end
if ttl > 0 then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  if redis.call('PTTL', KEYS[1]) < ttl + retention then
    redis.call('PEXPIRE', KEYS[1], ttl + retention)
  end
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
