// Indexed binary heap over small integer handles (request slots): O(log n) push, pop, update-key
// and remove by handle, O(1) lookup of a handle's position. Keys are (key, arrival, id) with a
// total order, so every implementation of the policy breaks ties the same way. `Max` flips the
// order (the running sets are searched for the *largest* remaining length). Plain C++17.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace trail::sched {

struct HeapKey {
  double key;
  double arrival;
  int64_t id;
};

inline bool key_less(const HeapKey& a, const HeapKey& b) {
  if (a.key != b.key) return a.key < b.key;
  if (a.arrival != b.arrival) return a.arrival < b.arrival;
  return a.id < b.id;
}

template <bool Max>
class IndexedHeap {
 public:
  explicit IndexedHeap(int32_t capacity = 0) : pos_(static_cast<size_t>(capacity), -1) {
    nodes_.reserve(static_cast<size_t>(capacity));
  }

  bool empty() const { return nodes_.empty(); }
  size_t size() const { return nodes_.size(); }
  int32_t capacity() const { return static_cast<int32_t>(pos_.size()); }
  bool contains(int32_t h) const { return h >= 0 && h < capacity() && pos_[h] >= 0; }

  int32_t top() const { return nodes_.front().h; }
  const HeapKey& top_key() const { return nodes_.front().k; }
  const HeapKey& key_of(int32_t h) const { return nodes_[pos_[h]].k; }
  // The handles in heap-array order (no particular order for the caller).
  template <class F>
  void for_each(F&& f) const {
    for (const Node& n : nodes_) f(n.h);
  }

  void push(int32_t h, const HeapKey& k) {
    check_handle(h);
    if (pos_[h] >= 0) throw std::logic_error("IndexedHeap::push: handle " + std::to_string(h) + " already present");
    nodes_.push_back(Node{k, h});
    sift_up(nodes_.size() - 1);
  }

  int32_t pop() {
    const int32_t h = nodes_.front().h;
    remove_at(0);
    return h;
  }

  void remove(int32_t h) {
    check_present(h);
    remove_at(static_cast<size_t>(pos_[h]));
  }

  void update(int32_t h, const HeapKey& k) {
    check_present(h);
    const size_t i = static_cast<size_t>(pos_[h]);
    const bool up = before(k, nodes_[i].k);
    nodes_[i].k = k;
    if (up) sift_up(i); else sift_down(i);
  }

  void clear() {
    for (const Node& n : nodes_) pos_[n.h] = -1;
    nodes_.clear();
  }

  // Bulk build: append handles in any order, then heapify() once (O(n), Floyd) before any other
  // call. Cheaper than n pushes or n updates when every key changed.
  void append_unordered(int32_t h, const HeapKey& k) {
    check_handle(h);
    pos_[h] = static_cast<int32_t>(nodes_.size());
    nodes_.push_back(Node{k, h});
  }
  void heapify() {
    for (size_t i = nodes_.size() / 2; i-- > 0;) sift_down(i);
  }

 private:
  struct Node {
    HeapKey k;
    int32_t h;
  };

  static bool before(const HeapKey& a, const HeapKey& b) { return Max ? key_less(b, a) : key_less(a, b); }

  void check_handle(int32_t h) const {
    if (h < 0 || h >= capacity())
      throw std::out_of_range("IndexedHeap: handle " + std::to_string(h) + " outside [0, " + std::to_string(capacity()) + ")");
  }
  void check_present(int32_t h) const {
    check_handle(h);
    if (pos_[h] < 0) throw std::logic_error("IndexedHeap: handle " + std::to_string(h) + " not present");
  }

  void remove_at(size_t i) {
    pos_[nodes_[i].h] = -1;
    Node last = nodes_.back();
    nodes_.pop_back();
    if (i == nodes_.size()) return;
    nodes_[i] = last;
    pos_[last.h] = static_cast<int32_t>(i);
    if (i > 0 && before(last.k, nodes_[(i - 1) / 2].k)) sift_up(i); else sift_down(i);
  }

  // Hole-based sifting: move the node once, not swap it at every level.
  void sift_up(size_t i) {
    Node n = nodes_[i];
    while (i > 0) {
      const size_t parent = (i - 1) / 2;
      if (!before(n.k, nodes_[parent].k)) break;
      nodes_[i] = nodes_[parent];
      pos_[nodes_[i].h] = static_cast<int32_t>(i);
      i = parent;
    }
    nodes_[i] = n;
    pos_[n.h] = static_cast<int32_t>(i);
  }

  void sift_down(size_t i) {
    const size_t n_nodes = nodes_.size();
    Node n = nodes_[i];
    while (true) {
      size_t child = 2 * i + 1;
      if (child >= n_nodes) break;
      if (child + 1 < n_nodes && before(nodes_[child + 1].k, nodes_[child].k)) ++child;
      if (!before(nodes_[child].k, n.k)) break;
      nodes_[i] = nodes_[child];
      pos_[nodes_[i].h] = static_cast<int32_t>(i);
      i = child;
    }
    nodes_[i] = n;
    pos_[n.h] = static_cast<int32_t>(i);
  }

  std::vector<Node> nodes_;
  std::vector<int32_t> pos_;
};

}  // namespace trail::sched
