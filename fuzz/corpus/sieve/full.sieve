require ["fileinto", "copy", "imap4flags", "vacation", "body", "relational", "envelope", "mailbox", "comparator-i;ascii-numeric"];
if header :contains "subject" "x" { fileinto :create :flags "\\Seen" "A/B"; }
elsif anyof(address :domain :is "from" "b.example", envelope :localpart :matches "to" "c*") { redirect :copy "z@y.example"; }
else { vacation :days 2 :subject "away" text:
back soon
..dot
.
; }
if header :value "ge" :comparator "i;ascii-numeric" "x-n" "5" { discard; stop; }
if body :contains "body" { addflag "$X"; removeflag "$X"; setflag "\\Flagged"; }
if size :over 1K { keep; }
