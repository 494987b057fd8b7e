//! Kubernetes' path: a private containerd with its CRI plugin on (the
//! `runc` and `moat` handlers, a CNI bridge of the test's own, locally
//! built pause and busybox images in the `k8s.io` namespace) and a
//! blocking CRI v1 client over its socket, as kubelet drives it.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    free_subnet, guest_assets, host_tools, skip, text, workspace, Containerd, MoatConfig, IMAGE,
};

pub mod stream;

pub use stream::StreamOutput;

/// How long a streaming Exec or Attach may take to end.
const STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The pause image the private containerd is configured with (built
/// from busybox: `sleep`, which pod stop kills with SIGKILL).
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";
/// Busybox with [`LAYERED_EXTRA`] small layers on top (32 in all), for
/// images whose layers would not fit a VM's block slots one by one.
pub const LAYERED_IMAGE: &str = "docker.io/library/layered:32";
/// The layers `scripts/busybox-image.sh` adds to [`LAYERED_IMAGE`].
pub const LAYERED_EXTRA: usize = 31;
/// The namespace of containerd's CRI plugin.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// The CNI plugins the pod network needs (Debian's containernetworking-plugins).
const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "loopback"];
const CNI_BIN: &str = "/usr/lib/cni";

/// A CRI call's failure: its gRPC status.
pub type CriResult<T> = Result<T, tonic::Status>;

/// A private containerd serving CRI, and a client of it.
pub struct Cri {
    /// The containerd (its `dir`, logs and leak checks).
    pub containerd: Containerd,
    /// The pod subnet of the test's CNI bridge (`10.214.<n>.0/24`).
    pub subnet: String,
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// Starts containerd with CRI for the test `tag` and imports the images;
/// None, after a loud skip, when the host lacks containerd, the CNI
/// plugins or moat's guest assets.
pub fn setup_cri(tag: &str, extra_moat_config: &str) -> Option<Cri> {
    let ready = host_tools()
        .and_then(|()| cni_plugins())
        .and_then(|()| guest_assets());
    let (kernel, initramfs) = match ready {
        Ok(assets) => assets,
        Err(why) => {
            skip(tag, &why);
            return None;
        }
    };
    let moat = MoatConfig {
        kernel,
        initramfs,
        vmm: None,
        extra: extra_moat_config.into(),
    };
    let subnet = format!("10.214.{}.0/24", free_subnet("10.214", 1));
    let bridge = format!("mcri{}", std::process::id() % 100_000);
    let env = [
        ("MOAT_CRI", "1"),
        ("MOAT_CRI_SUBNET", subnet.as_str()),
        ("MOAT_CRI_BRIDGE", bridge.as_str()),
        ("MOAT_CRI_PAUSE", PAUSE_IMAGE),
    ];
    let containerd = Containerd::start_with_env(tag, &moat, &env);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let channel = rt.block_on(connect(containerd.sock.clone()));
    let cri = Cri {
        containerd,
        subnet,
        rt,
        runtime: RuntimeServiceClient::new(channel.clone()),
        images: ImageServiceClient::new(channel),
    };
    cri.import_images();
    Some(cri)
}

fn cni_plugins() -> Result<(), String> {
    match CNI_PLUGINS
        .iter()
        .find(|p| !Path::new(CNI_BIN).join(p).exists())
    {
        Some(p) => Err(format!(
            "CNI plugin {CNI_BIN}/{p} is missing (scripts/deps.sh installs containernetworking-plugins)"
        )),
        None => Ok(()),
    }
}

async fn connect(sock: PathBuf) -> Channel {
    // The URI is a placeholder: the connector dials the socket.
    Endpoint::try_from("http://[::]:50051")
        .expect("a valid endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move {
                let s = tokio::net::UnixStream::connect(sock).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .expect("connect to containerd's CRI socket")
}

/// A command line as CRI carries it.
fn strings(cmd: &[&str]) -> Vec<String> {
    cmd.iter().map(|s| s.to_string()).collect()
}

impl Cri {
    fn block<T>(&self, f: impl Future<Output = CriResult<tonic::Response<T>>>) -> CriResult<T> {
        self.rt.block_on(f).map(tonic::Response::into_inner)
    }

    /// One call of the runtime service, on a clone of the client (a
    /// cheap handle on the one channel).
    fn rpc<T, F>(&self, call: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> CriResult<T>
    where
        F: Future<Output = CriResult<tonic::Response<T>>>,
    {
        self.block(call(self.runtime.clone()))
    }

    /// Reads to its end the stream the stream server serves at the `url`
    /// that Exec or Attach answered (`what` names the call).
    fn stream(
        &self,
        what: &str,
        url: CriResult<String>,
        stdin: &[u8],
    ) -> Result<StreamOutput, String> {
        let url = url.map_err(|e| format!("{what}: {e}"))?;
        self.rt.block_on(stream::run(&url, stdin, STREAM_TIMEOUT))
    }

    /// Builds busybox, the pause image and the many-layer image and
    /// imports them for CRI.
    fn import_images(&self) {
        let dir = &self.containerd.dir;
        let extra = LAYERED_EXTRA.to_string();
        let images = [
            (IMAGE, r#"["sh"]"#, "0", "busybox.tar"),
            (PAUSE_IMAGE, r#"["sleep","2147483647"]"#, "0", "pause.tar"),
            (LAYERED_IMAGE, r#"["sh"]"#, extra.as_str(), "layered.tar"),
        ];
        for (name, cmd, layers, file) in images {
            let tar = dir.join(file);
            let out = Command::new(workspace().join("scripts/busybox-image.sh"))
                .arg(&tar)
                .args([name, cmd, layers])
                .output()
                .expect("run scripts/busybox-image.sh");
            assert!(out.status.success(), "{}", text(&out));
            let tar = tar.to_string_lossy();
            let out = self
                .containerd
                .ctr(&["-n", K8S_NAMESPACE, "images", "import", &tar]);
            assert!(out.status.success(), "import {name}: {}", text(&out));
        }
        // CRI sees an image once its event reached the plugin.
        for _ in 0..100 {
            if [PAUSE_IMAGE, IMAGE, LAYERED_IMAGE]
                .iter()
                .all(|i| self.image_present(i))
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("CRI does not list the imported images");
    }

    fn image_present(&self, name: &str) -> bool {
        let mut c = self.images.clone();
        let req = ImageStatusRequest {
            image: Some(ImageSpec {
                image: name.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        self.block(async move { c.image_status(req).await })
            .is_ok_and(|r| r.image.is_some())
    }

    /// RunPodSandbox with `handler`; the pod's id.
    pub fn run_pod(&self, config: PodSandboxConfig, handler: &str) -> CriResult<String> {
        let req = RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: handler.into(),
        };
        let id = self
            .rpc(|mut c| async move { c.run_pod_sandbox(req).await })?
            .pod_sandbox_id;
        self.containerd.note_grouping(&[], &id);
        Ok(id)
    }

    /// PodSandboxStatus.
    pub fn pod_status(&self, id: &str) -> CriResult<PodSandboxStatus> {
        let req = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let status = self.rpc(|mut c| async move { c.pod_sandbox_status(req).await })?;
        status
            .status
            .ok_or_else(|| tonic::Status::internal("PodSandboxStatus without a status"))
    }

    /// StopPodSandbox.
    pub fn stop_pod(&self, id: &str) -> CriResult<()> {
        let req = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.rpc(|mut c| async move { c.stop_pod_sandbox(req).await })
            .map(drop)
    }

    /// RemovePodSandbox.
    pub fn remove_pod(&self, id: &str) -> CriResult<()> {
        let req = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.rpc(|mut c| async move { c.remove_pod_sandbox(req).await })
            .map(drop)
    }

    /// ListPodSandbox, unfiltered.
    pub fn list_pods(&self) -> CriResult<Vec<PodSandbox>> {
        let req = ListPodSandboxRequest { filter: None };
        Ok(self
            .rpc(|mut c| async move { c.list_pod_sandbox(req).await })?
            .items)
    }

    /// CreateContainer in `pod` (whose config was `pod_config`); its id.
    pub fn create_container(
        &self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        config: ContainerConfig,
    ) -> CriResult<String> {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        Ok(self
            .rpc(|mut c| async move { c.create_container(req).await })?
            .container_id)
    }

    /// StartContainer.
    pub fn start_container(&self, id: &str) -> CriResult<()> {
        let req = StartContainerRequest {
            container_id: id.into(),
        };
        self.rpc(|mut c| async move { c.start_container(req).await })
            .map(drop)
    }

    /// StopContainer, with SIGKILL after `timeout_secs`.
    pub fn stop_container(&self, id: &str, timeout_secs: i64) -> CriResult<()> {
        let req = StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_secs,
        };
        self.rpc(|mut c| async move { c.stop_container(req).await })
            .map(drop)
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) -> CriResult<()> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.rpc(|mut c| async move { c.remove_container(req).await })
            .map(drop)
    }

    /// ContainerStatus.
    pub fn container_status(&self, id: &str) -> CriResult<ContainerStatus> {
        let req = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let status = self.rpc(|mut c| async move { c.container_status(req).await })?;
        status
            .status
            .ok_or_else(|| tonic::Status::internal("ContainerStatus without a status"))
    }

    /// ListContainers of one pod (all pods for "").
    pub fn list_containers(&self, pod: &str) -> CriResult<Vec<Container>> {
        let req = ListContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pod.into(),
                ..Default::default()
            }),
        };
        Ok(self
            .rpc(|mut c| async move { c.list_containers(req).await })?
            .containers)
    }

    /// UpdateContainerResources of container `id`.
    pub fn update_resources(&self, id: &str, linux: LinuxContainerResources) -> CriResult<()> {
        let req = UpdateContainerResourcesRequest {
            container_id: id.into(),
            linux: Some(linux),
            ..Default::default()
        };
        self.rpc(|mut c| async move { c.update_container_resources(req).await })
            .map(drop)
    }

    /// ContainerStats of container `id`.
    pub fn container_stats(&self, id: &str) -> CriResult<ContainerStats> {
        let req = ContainerStatsRequest {
            container_id: id.into(),
        };
        self.rpc(|mut c| async move { c.container_stats(req).await })?
            .stats
            .ok_or_else(|| tonic::Status::internal("ContainerStats without stats"))
    }

    /// ListContainerStats of the containers of pod `pod`.
    pub fn list_container_stats(&self, pod: &str) -> CriResult<Vec<ContainerStats>> {
        let req = ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod.into(),
                ..Default::default()
            }),
        };
        self.rpc(|mut c| async move { c.list_container_stats(req).await })
            .map(|r| r.stats)
    }

    /// PodSandboxStats of pod `id`.
    pub fn pod_stats(&self, id: &str) -> CriResult<PodSandboxStats> {
        let req = PodSandboxStatsRequest {
            pod_sandbox_id: id.into(),
        };
        self.rpc(|mut c| async move { c.pod_sandbox_stats(req).await })?
            .stats
            .ok_or_else(|| tonic::Status::internal("PodSandboxStats without stats"))
    }

    /// ReopenContainerLog of container `id`.
    pub fn reopen_log(&self, id: &str) -> CriResult<()> {
        let req = ReopenContainerLogRequest {
            container_id: id.into(),
        };
        self.rpc(|mut c| async move { c.reopen_container_log(req).await })
            .map(drop)
    }

    /// A streaming Exec of `cmd` in container `id`, fed `stdin`, read to
    /// its end.
    pub fn exec_stream(
        &self,
        id: &str,
        cmd: &[&str],
        stdin: &[u8],
    ) -> Result<StreamOutput, String> {
        let req = ExecRequest {
            container_id: id.into(),
            cmd: strings(cmd),
            tty: false,
            stdin: !stdin.is_empty(),
            stdout: true,
            stderr: true,
        };
        let url = self.rpc(|mut c| async move { c.exec(req).await });
        self.stream("Exec", url.map(|r| r.url), stdin)
    }

    /// Attach to container `id` (started with stdin open), feeding it
    /// `stdin`, read to the stream's end.
    pub fn attach(&self, id: &str, stdin: &[u8]) -> Result<StreamOutput, String> {
        let req = AttachRequest {
            container_id: id.into(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        };
        let url = self.rpc(|mut c| async move { c.attach(req).await });
        self.stream("Attach", url.map(|r| r.url), stdin)
    }

    /// PortForward to `port` of pod `pod`: sends `request` there and reads
    /// the answer to the stream's end.
    pub fn port_forward(
        &self,
        pod: &str,
        port: u16,
        request: &[u8],
    ) -> Result<stream::ForwardOutput, String> {
        let req = PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![port.into()],
        };
        let url = self
            .rpc(|mut c| async move { c.port_forward(req).await })
            .map_err(|e| format!("PortForward: {e}"))?
            .url;
        self.rt
            .block_on(stream::forward(&url, port, request, STREAM_TIMEOUT))
    }

    /// ExecSync of `cmd` in container `id`.
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> CriResult<ExecSyncResponse> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: strings(cmd),
            timeout: 0,
        };
        self.rpc(|mut c| async move { c.exec_sync(req).await })
    }

    /// Stops and removes every pod left (a failed test's), so that CNI
    /// releases their network namespaces and addresses.
    pub fn remove_all_pods(&self) {
        for p in self.list_pods().unwrap_or_default() {
            let _ = self.stop_pod(&p.id);
            let _ = self.remove_pod(&p.id);
        }
    }

    /// The CRI namespaces' state after the test: no pod, no container, no
    /// task or container in containerd's `k8s.io` namespace, and the
    /// harness's checks ([`Containerd::assert_no_leaks`]).
    pub fn assert_no_leaks(&self) {
        let pods = self.list_pods().expect("ListPodSandbox");
        assert!(pods.is_empty(), "pods left: {pods:?}");
        let containers = self.list_containers("").expect("ListContainers");
        assert!(containers.is_empty(), "containers left: {containers:?}");
        for what in ["tasks", "containers"] {
            let out = self
                .containerd
                .ctr(&["-n", K8S_NAMESPACE, what, "ls", "-q"]);
            let ids = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            assert!(ids.is_empty(), "{what} left in {K8S_NAMESPACE}: {ids}");
        }
        self.containerd.assert_no_leaks();
    }

    /// Where a pod's log directory lies under the test's directory.
    pub fn log_dir(&self, pod: &str) -> PathBuf {
        self.containerd.dir.join("pod-logs").join(pod)
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.containerd.diagnostics());
        }
        self.remove_all_pods();
        let _ = fs::remove_dir_all(self.containerd.dir.join("pod-logs"));
    }
}
