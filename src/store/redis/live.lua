-- Lists, on one Redis server, a batch of the elections of one kind whose lease is live, from its
-- index (see lease.lua), and first removes up to ARGV[3] entries of leases that ended — so a
-- listing costs what the live leases and bounded batches cost, never the number of elections
-- ever used, and no call holds the server for long.
--
-- KEYS[1]  the kind's index.
-- ARGV[1]  where the batch starts: the expiry (ms) of the previous batch's last entry, 0 at first.
-- ARGV[2]  how many entries with exactly that expiry the previous batches returned (to skip).
-- ARGV[3]  how many entries to return, and to remove, at most.
-- Returns {name, expiry, name, expiry, ...} in order of expiry.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local batch = tonumber(ARGV[3])
local ended = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, batch)
if #ended > 0 then
  redis.call('ZREM', KEYS[1], unpack(ended))
end
local from, skip = tonumber(ARGV[1]), tonumber(ARGV[2])
if from <= now then
  from, skip = now + 1, 0
end
return redis.call('ZRANGEBYSCORE', KEYS[1], from, '+inf', 'WITHSCORES', 'LIMIT', skip, batch)
