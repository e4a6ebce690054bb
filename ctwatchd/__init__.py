"""ctwatchd: keeps nf_conntrack, nf_nat and br_netfilter loaded and restores them in order."""

__version__ = "0.1.0"
