-- Group messages with one mention were stored with `mentions` as a bare JSON
-- string ("bob") instead of an array (["bob"]): the batch insert passed the
-- lists inside a jsonb[] parameter, and the driver took each list for a
-- sub-array. The insert now passes JSON text; this turns the strings already
-- stored into one-element arrays. (Two or more mentions failed the batch, so
-- nothing else is stored wrongly.)
UPDATE messages SET mentions = jsonb_build_array(mentions)
WHERE mentions IS NOT NULL AND jsonb_typeof(mentions) = 'string';
