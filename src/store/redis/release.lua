-- Undoes a partial Redlock grant on one Redis server: drops the lease if ARGV[1] holds it there
-- with exactly the token ARGV[2] (the grant being rolled back). The token itself stays, so it
-- still only ever increases.
--
-- KEYS[1]  the election's record (see lease.lua).
-- Returns 1 when the lease was dropped, 0 otherwise.

local record = redis.call('HMGET', KEYS[1], 'h', 't')
if record[1] == ARGV[1] and tonumber(record[2]) == tonumber(ARGV[2]) then
  redis.call('HDEL', KEYS[1], 'h', 'e')
  return 1
end
return 0
