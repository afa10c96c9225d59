-- Applies one command of the lease engine to one election, atomically, on one Redis server.
--
-- This is `decide` of src/lease.rs run where the data lives; the store's differential test
-- drives both with the same commands and requires identical outcomes.
--
-- KEYS[1]  the election's record, a hash: h = holder, t = fencing token, e = expiry (ms, server
--          clock). The record outlives the lease, so the token keeps increasing after resign and
--          expiry.
-- ARGV[1]  command: campaign | extend | resign | handover
-- ARGV[2]  the candidate (campaign) or leader (extend, resign, handover)
-- ARGV[3]  term in milliseconds (ignored by resign)
--
-- Returns {outcome, leader, token, ttl_ms} (leader empty when nobody leads); outcome (quorum.rs
-- `code`): 1 renewed, 2 following, 3 resigned, 4 handed over, 5 not holder, 6 elected.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local record = redis.call('HMGET', KEYS[1], 'h', 't', 'e')
local holder = record[1] or nil
local token = tonumber(record[2]) or 0
local expires = tonumber(record[3]) or 0
local live = holder ~= nil and now < expires

local command, who, term = ARGV[1], ARGV[2], tonumber(ARGV[3])

local function grant(code, tok)
  redis.call('HSET', KEYS[1], 'h', who, 't', tok, 'e', now + term)
  return {code, who, tok, term}
end

if command == 'campaign' then
  if live and holder == who then
    return grant(1, token)
  elseif live then
    return {2, holder, token, expires - now}
  end
  return grant(6, token + 1)
elseif command == 'extend' then
  if live and holder == who then
    return grant(1, token)
  elseif live then
    return {5, holder, token, expires - now}
  elseif holder == who then
    -- Its own lease ran out and nobody took it: the leader gets it back, as a new lease.
    return grant(6, token + 1)
  end
  return {5, '', token, 0}
elseif command == 'resign' then
  if live and holder == who then
    redis.call('HDEL', KEYS[1], 'h', 'e')
    return {3, who, token, 0}
  elseif live then
    return {5, holder, token, expires - now}
  end
  -- Nobody leads. The caller's own expired lease is dropped so Extend cannot revive it.
  if holder == who then
    redis.call('HDEL', KEYS[1], 'h', 'e')
  end
  return {3, '', token, 0}
elseif command == 'handover' then
  return grant(4, token + 1)
end
return redis.error_reply('unknown lease command ' .. tostring(command))
