-- Sets, on one Redis server, the fencing token of the lease a Redlock command granted or renewed
-- there to exactly the token the command reports (quorum.rs), only if the record's last change is
-- that command's: a lower one is raised, so the token is durable on a majority before anyone is
-- told; a higher one that this command itself created (a late grant of a new lease, from a clock
-- a millisecond ahead, never reported) is lowered, so every server of the lease answers the same
-- token to the holder's renewals. A renewal's token is never lowered: an earlier command made it
-- and may have reported it (a renewal that ran here after a later command of the same holder,
-- reordered after the server lost its scripts, finds that command's new token).
--
-- KEYS[1]  the election's record (see lease.lua).
-- ARGV[1]  the command's id.
-- ARGV[2]  the token the command reports.
-- Returns the token now stored.

local record = redis.call('HMGET', KEYS[1], 'i', 't', 'o')
local token = tonumber(record[2]) or 0
local target = tonumber(ARGV[2])
local created = record[3] == '4' or record[3] == '6' or record[3] == '9'
if record[1] == ARGV[1] and (target > token or (target < token and created)) then
  redis.call('HSET', KEYS[1], 't', target)
  return target
end
return token
