//! Services: virtual addresses (a Kubernetes ClusterIP and port) and the
//! ready endpoints behind them.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

/// Where connections to one port of a Service's virtual address may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The Service's name and namespace.
    pub name: String,
    pub namespace: String,
    /// The ready endpoints, each with the port this Service port leads to
    /// on it (named target ports resolve per endpoint).
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePort {
    /// `namespace/name`, how operators refer to a Service.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The Service's DNS name in a cluster whose domain is `domain`, which
    /// Istio's metrics call the destination service.
    pub fn hostname(&self, domain: &str) -> String {
        format!("{}.{}.svc.{domain}", self.name, self.namespace)
    }
}

/// Every service port of the mesh, by virtual address and port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Services {
    by_vip: HashMap<SocketAddrV4, Arc<ServicePort>>,
    /// The virtual addresses, whatever the port.
    vips: HashSet<Ipv4Addr>,
}

impl Services {
    pub fn new(ports: impl IntoIterator<Item = (SocketAddrV4, ServicePort)>) -> Self {
        let by_vip: HashMap<SocketAddrV4, Arc<ServicePort>> = ports
            .into_iter()
            .map(|(vip, port)| (vip, Arc::new(port)))
            .collect();
        let vips = by_vip.keys().map(|vip| *vip.ip()).collect();
        Self { by_vip, vips }
    }

    /// Whether `ip` is a Service's virtual address.
    pub fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.vips.contains(&ip)
    }

    /// Every service port with its virtual address and port, in no
    /// particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddrV4, &Arc<ServicePort>)> {
        self.by_vip.iter()
    }

    /// The service port at `vip` (a ClusterIP and a port), if any.
    pub fn get(&self, vip: SocketAddrV4) -> Option<&Arc<ServicePort>> {
        self.by_vip.get(&vip)
    }

    pub fn len(&self) -> usize {
        self.by_vip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_vip.is_empty()
    }
}
