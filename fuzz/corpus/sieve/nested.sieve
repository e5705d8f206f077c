if true { if true { if true { keep; } } }
/* c */ # c
if not exists ["a","b"] { discard; }
