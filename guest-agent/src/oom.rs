//! OOM events: inotify on each container's memory.events; a rising
//! oom_kill count becomes an OomEvent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::cgroup::Cgroup;
use crate::error::{IoContext, Result};
use crate::events::EventQueue;

struct Watched {
    id: String,
    cgroup: Cgroup,
    kills: u64,
}

/// Watches containers' memory.events and queues an OOM event per new
/// OOM kill.
#[derive(Clone)]
pub struct OomWatcher {
    inotify: Arc<Inotify>,
    watches: Arc<Mutex<HashMap<WatchDescriptor, Watched>>>,
}

impl OomWatcher {
    /// Starts the watcher thread, which pushes events onto `events`.
    pub fn start(events: Arc<EventQueue>) -> Result<OomWatcher> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ctx(|| "inotify_init".into())?;
        let w = OomWatcher {
            inotify: Arc::new(inotify),
            watches: Arc::default(),
        };
        let me = w.clone();
        std::thread::Builder::new()
            .name("oom".into())
            .spawn(move || me.run(&events))
            .ctx(|| "spawning the OOM watcher".into())?;
        Ok(w)
    }

    /// Watches the cgroup of container `id`; a failure only loses its OOM
    /// events (logged).
    pub fn watch(&self, id: &str, cgroup: &Cgroup) {
        match self
            .inotify
            .add_watch(&cgroup.path.join("memory.events"), AddWatchFlags::IN_MODIFY)
        {
            Ok(wd) => {
                self.watches.lock().unwrap().insert(
                    wd,
                    Watched {
                        id: id.to_owned(),
                        cgroup: cgroup.clone(),
                        kills: cgroup.oom_kills(),
                    },
                );
            }
            Err(e) => log::warn!("no OOM events for {id}: {e}"),
        }
    }

    /// Stops watching container `id`.
    pub fn unwatch(&self, id: &str) {
        let mut w = self.watches.lock().unwrap();
        let wds: Vec<WatchDescriptor> = w
            .iter()
            .filter(|(_, v)| v.id == id)
            .map(|(k, _)| *k)
            .collect();
        for wd in wds {
            w.remove(&wd);
            let _ = self.inotify.rm_watch(wd);
        }
    }

    fn run(&self, events: &EventQueue) {
        loop {
            let evs = match self.inotify.read_events() {
                Ok(evs) => evs,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("OOM watcher stopped: {e}");
                    return;
                }
            };
            let mut w = self.watches.lock().unwrap();
            for ev in evs {
                if let Some(watched) = w.get_mut(&ev.wd) {
                    let kills = watched.cgroup.oom_kills();
                    if kills > watched.kills {
                        watched.kills = kills;
                        log::info!("OOM kill in container {}", watched.id);
                        events.push_oom(&watched.id);
                    }
                }
            }
        }
    }
}
