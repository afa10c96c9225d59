-- Reads the live leader of one election on one Redis server (read-only).
--
-- KEYS[1]  the election's record (see lease.lua).
-- Returns {leader, token, ttl_ms}; leader is empty when no lease is live.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local record = redis.call('HMGET', KEYS[1], 'h', 't', 'e')
local token = tonumber(record[2]) or 0
local expires = tonumber(record[3]) or 0
if record[1] and now < expires then
  return {record[1], token, expires - now}
end
return {'', token, 0}
