"""Fleet: the agents of many hosts sharing each VM's enforcement record in
etcd (the policy's `fleet:` section), so a VM keeps its block wherever it
runs and a release on one host is a release everywhere."""
