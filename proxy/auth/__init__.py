"""Client authentication: keys, roles, SCRAM-SHA-256 (scramp), md5 and cleartext — pure steps."""
