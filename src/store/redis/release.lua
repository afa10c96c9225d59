-- Takes back, on one Redis server, the lease a failed Redlock command created there (quorum.rs):
-- only if the record's last change is that command's own grant of a new lease (lease.lua `o` 4
-- or 6) — never a renewal, never a lease another command has changed since. The token stays, so
-- it still only increases.
--
-- KEYS[1]  the election's record (see lease.lua).
-- ARGV[1]  the failed command's id.
-- Returns 1 when the lease was dropped, 0 otherwise.

local record = redis.call('HMGET', KEYS[1], 'h', 'i', 'o')
if record[1] and record[2] == ARGV[1] and (record[3] == '4' or record[3] == '6') then
  redis.call('HDEL', KEYS[1], 'h', 'e')
  return 1
end
return 0
