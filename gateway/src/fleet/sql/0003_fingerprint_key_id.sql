-- Central store schema version 3: each host says which fingerprint key it
-- uses (a non-secret id of it, see FingerprintKey::id), so that hosts whose
-- keys differ (the same secret, two fingerprints, two findings) are named by
-- `gateway store status` and warned about when they ship.

ALTER TABLE fleet_hosts ADD COLUMN fingerprint_key_id text;
