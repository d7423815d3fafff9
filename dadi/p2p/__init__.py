"""P2P distribution: the supernode (an HTTP piece cache in front of a registry) and, later, peers and the tracker."""
