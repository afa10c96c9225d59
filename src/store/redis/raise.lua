-- Raises an election's fencing token to at least ARGV[1] on one Redis server, if ARGV[2] still
-- holds the lease there (Redlock: makes a reported token durable on a majority; see quorum.rs).
--
-- KEYS[1]  the election's record (see lease.lua).
-- Returns the token now stored.

local record = redis.call('HMGET', KEYS[1], 'h', 't')
local token = tonumber(record[2]) or 0
local target = tonumber(ARGV[1])
if record[1] == ARGV[2] and token < target then
  redis.call('HSET', KEYS[1], 't', target)
  return target
end
return token
