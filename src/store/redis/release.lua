-- Takes back, on one Redis server, the lease a failed Redlock command created there (quorum.rs):
-- only if the record's last change is that command's own grant of a new lease (lease.lua `o` 4
-- or 6) — never a renewal, never a lease another command has changed since. A handover that
-- replaced another holder's live lease puts that lease back as it was (holder, expiry, token):
-- a handover that ran here late, after the agent had given up on it, must not cost the holder
-- its lease on this server. Otherwise nobody holds the lease, and the token stays.
--
-- KEYS[1]  the election's record (see lease.lua).
-- ARGV[1]  the failed command's id.
-- Returns 1 when the lease was taken back, 0 otherwise.

local record = redis.call('HMGET', KEYS[1], 'h', 'i', 'o', 'ph', 'pe', 'pt')
if not (record[1] and record[2] == ARGV[1] and (record[3] == '4' or record[3] == '6')) then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
if record[4] and tonumber(record[5]) > now then
  redis.call('HSET', KEYS[1], 'h', record[4], 'e', record[5], 't', record[6])
else
  redis.call('HDEL', KEYS[1], 'h', 'e')
end
redis.call('HDEL', KEYS[1], 'ph', 'pe', 'pt')
return 1
