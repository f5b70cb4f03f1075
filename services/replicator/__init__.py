"""The CMS replicator: one per site, keeps the site's `cms/` in agreement with its peers'.

merge.py: the merge rule and digests (pure); rules.py: what replicates and under which name;
service.py: the local side; link.py: the connection to one peer site's broker.
"""
