-- Where the token counts of a row come from: 'vendor' (the vendor's usage report) or
-- 'estimate' (the gateway's estimate, when the vendor sent none). NULL: no usage known.
ALTER TABLE usage_events ADD COLUMN usage_source TEXT;
