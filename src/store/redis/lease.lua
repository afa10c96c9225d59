-- Applies one command of the lease engine to one election, atomically, on one Redis server.
--
-- This is `decide` of src/lease.rs run where the data lives; the store's differential test
-- drives both with the same commands and requires identical outcomes.
--
-- KEYS[1]  the election's record, a hash:
--            h  the holder (absent when nobody holds a lease);
--            t  the fencing token of the current or last lease (kept after resign and expiry,
--               so it keeps increasing); a new lease gets t + 1, or this server's clock in ms if
--               that is higher, so tokens also rise over any record lost in a failover (or removed);
--            e  the expiry, in ms on this server's clock;
--            i  the id of the last command that changed the record;
--            o  what that command did: 1 renewed, 3 resigned a live lease, 4 handed over to a
--               new holder, 6 elected, 7 dropped the caller's own expired lease, 9 handed over
--               to the live holder. Only 4 and 6 created a lease that release.lua may take back;
--            ph, pe, pt  the live lease a handover (4) replaced — holder, expiry, token — which
--               release.lua puts back if that handover failed (absent otherwise).
-- KEYS[2]  the index of the kind's live leases, a sorted set of election names by expiry (ms on
--          this server's clock) — absent in Cluster and sharding modes, where it may be in
--          another slot or on other servers and the agent keeps it (index.lua). Entries of leases that ended are removed a few at a time
--          here and by live.lua, never all at once.
-- ARGV[1]  command: campaign | extend | resign | handover
-- ARGV[2]  the candidate (campaign) or leader (extend, resign, handover)
-- ARGV[3]  term in milliseconds (ignored by resign)
-- ARGV[4]  the command's id, unique per command: a command run again (after a Cluster redirect
--          or a timeout) answers what its first run did instead of acting twice
-- ARGV[5]  the channel to announce a change of leadership on, or empty (Redlock: the agent
--          announces what a majority decided); published here, with the change, so announcements
--          are in the order the changes were made
-- ARGV[6]  the election's kind and name, separated by a space (for the announcement)
-- ARGV[7]  retention in milliseconds: every write sets the record to expire this long after its
--          lease ends, so records of elections nobody uses any more are removed by Redis itself.
--          A new record's first token is this server's clock in ms, above every token of a
--          record removed at least a retention ago (tokens outrun the clock only by the grants
--          made faster than one per millisecond).
-- ARGV[8]  the election's name (the index's member)
-- ARGV[9]  handover only: the holder the live lease must have, or empty for any (or none)
-- ARGV[10] handover only: the token the live lease must have, or 0 for any; a conditional
--          handover whose expectation is not met changes nothing and answers 5 (not holder)
--
-- Returns {outcome, leader, token, ttl_ms} (leader empty when nobody leads); outcome (quorum.rs
-- `code`): 1 renewed, 2 following, 3 resigned, 4 handed over, 5 not holder, 6 elected.

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local record = redis.call('HMGET', KEYS[1], 'h', 't', 'e', 'i', 'o', 'ph')
local holder = record[1] or nil
local token = tonumber(record[2]) or 0
local expires = tonumber(record[3]) or 0
local live = holder ~= nil and now < expires

local command, who, term, id = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local retention = tonumber(ARGV[7])
local next_token = math.max(token + 1, now)

if record[4] == id then
  -- This very command already ran here: answer what it did, do nothing again.
  local done = tonumber(record[5])
  if done == 3 then
    return {3, who, token, 0}
  elseif done == 7 then
    return {3, '', token, 0}
  elseif done == 9 then
    return {4, who, token, term}
  end
  return {done, who, token, term}
end

-- Announces a change (see src/store/redis/announce.rs for the format).
local function announce(cause, tok, ttl)
  if ARGV[5] ~= '' then
    local message = string.format('%s %.0f %.0f %s %s', cause, tok, ttl, ARGV[6], who)
    redis.call('PUBLISH', ARGV[5], message)
  end
end

-- Keeps the kind's index: the election listed until `expiry` (removed when 0), a few entries of
-- ended leases removed, and the index itself kept as long as its longest record.
local function index(expiry)
  local live = KEYS[2]
  if not live then
    return
  end
  local ended = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, 8)
  if #ended > 0 then
    redis.call('ZREM', live, unpack(ended))
  end
  if expiry > 0 then
    redis.call('ZADD', live, expiry, ARGV[8])
    if redis.call('PTTL', live) < expiry - now + retention then
      redis.call('PEXPIRE', live, expiry - now + retention)
    end
  else
    redis.call('ZREM', live, ARGV[8])
  end
end

local function grant(code, tok, expiry, done)
  redis.call('HSET', KEYS[1], 'h', who, 't', tok, 'e', expiry, 'i', id, 'o', done)
  if done == 4 and live then
    -- Kept so that a failed handover (one that ran here late, after the agent gave up on it)
    -- puts the lease it replaced back rather than leaving nobody — or its holder a minority.
    redis.call('HSET', KEYS[1], 'ph', holder, 'pe', expires, 'pt', token)
  elseif record[6] then
    redis.call('HDEL', KEYS[1], 'ph', 'pe', 'pt')
  end
  redis.call('PEXPIRE', KEYS[1], expiry - now + retention)
  index(expiry)
  if code == 6 then
    announce('elected', tok, term)
  elseif code == 4 then
    announce('handed_over', tok, term)
  end
  return {code, who, tok, term}
end

-- A renewal never shortens a live lease: one whose answer was lost must not end a term that
-- its holder still counts on.
local function renewal()
  return math.max(expires, now + term)
end

if command == 'campaign' then
  if live and holder == who then
    return grant(1, token, renewal(), 1)
  elseif live then
    return {2, holder, token, expires - now}
  end
  return grant(6, next_token, now + term, 6)
elseif command == 'extend' then
  if live and holder == who then
    return grant(1, token, renewal(), 1)
  elseif live then
    return {5, holder, token, expires - now}
  elseif holder == who then
    -- Its own lease ran out and nobody took it: the leader gets it back, as a new lease.
    return grant(6, next_token, now + term, 6)
  end
  return {5, '', token, 0}
elseif command == 'resign' then
  if live and holder == who then
    redis.call('HDEL', KEYS[1], 'h', 'e')
    redis.call('HSET', KEYS[1], 'i', id, 'o', 3)
    redis.call('PEXPIRE', KEYS[1], retention)
    index(0)
    announce('resigned', token, 0)
    return {3, who, token, 0}
  elseif live then
    return {5, holder, token, expires - now}
  end
  -- Nobody leads. The caller's own expired lease is dropped so Extend cannot revive it.
  if holder == who then
    redis.call('HDEL', KEYS[1], 'h', 'e')
    redis.call('HSET', KEYS[1], 'i', id, 'o', 7)
    redis.call('PEXPIRE', KEYS[1], retention)
    index(0)
  end
  return {3, '', token, 0}
elseif command == 'handover' then
  local expected_holder, expected_token = ARGV[9] or '', tonumber(ARGV[10]) or 0
  if (expected_holder ~= '' and not (live and holder == expected_holder))
      or (expected_token ~= 0 and not (live and token == expected_token)) then
    if live then
      return {5, holder, token, expires - now}
    end
    return {5, '', token, 0}
  end
  if live and holder == who then
    -- To the live holder itself: a renewal with a new token.
    return grant(4, next_token, renewal(), 9)
  end
  return grant(4, next_token, now + term, 4)
end
return redis.error_reply('unknown lease command ' .. tostring(command))
