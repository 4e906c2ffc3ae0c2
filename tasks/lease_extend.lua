-- Extend a lease, but only if the caller still holds it.
--
-- KEYS[1]  string: the lease, whose value is the owner's id
-- ARGV[1]  owner: the id the caller acquired the lease with
-- ARGV[2]  ttl in milliseconds, counted from now (replaces the remaining time)
--
-- Returns 1 if the lease now expires in ttl, 0 if it had expired or another owner holds it.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
